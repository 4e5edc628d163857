"""Compiled code saved to disk, so that a restarted server loads it instead of compiling again.

Inductor's on-disk caches save the generated kernels, but not Dynamo's tracing of the model's Python,
which is most of a compile with a warm cache (about 21 s of the SDXL UNet's 25 s on the H200). torch's
ahead-of-time compile (`torch.compile(fullgraph=True).aot_compile`, saved by `save_compiled_function`,
read back by `torch.compiler.load_compiled_function`) keeps the traced bytecode, the compiled graph and
its guards in one file: loading it runs no Dynamo at all.

What a saved compile is valid for is decided here, not by Dynamo's guards: only the guards that can
be saved without the model's Python objects are kept (every tensor's shape, dtype, device and strides;
the grad and autocast state; the dynamic batch size's range: torch's keep_portable_guards_unsafe).
Everything else the trace depended on goes into the file's key: the model's module classes and
parameter shapes, the call's constant arguments, ComfyUI's version and launch flags (they pick attention
and cast functions), the versions of torch and Triton, the GPU. And the source lines Dynamo traced (the
model's, ComfyUI's and this pack's) are compared with the installed ones before a load: an updated ComfyUI
or pack compiles again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .captured_graph import interrupted_by_a_sync_check, retried_after_sync_checks, wait_for
from .process_settings import no_compile_worker_processes

# The disk the saved compiles may take together, the most recently used kept: an SDXL size (UNet and VAE
# decode) takes about 77 MB, so about 26 sizes.
MAX_SAVED_BYTES = 2 * 1024**3
SUFFIX = ".fewstep-compiled"
DIRECTORY_VARIABLE = "FEWSTEP_SAVED_COMPILES_DIR"
FORMAT = 1  # the layout of a key and a file; a new one makes every older file unused
# What a restarted server reads ahead when a prompt with Few-Step Accelerate is queued: the most recently
# used files, two sizes' UNet and VAE decode. Reading one takes seconds (README, Speed), which then overlap
# the prompt's loading of the checkpoint instead of following it.
PRELOAD_FILES = 4

# This installation of the pack: its files' names start with it. A saved compile refers to the pack's
# code by the module name ComfyUI gave it (the pack folder's path), so another installation sharing the
# folder (another ComfyUI, another base directory) cannot read it; reading ahead takes only this one's.
INSTALLATION = hashlib.sha256(__name__.rpartition(".fewstep.")[0].encode()).hexdigest()[:8]

log = logging.getLogger("fewstep.acceleration")


@dataclasses.dataclass(frozen=True)
class SavedForm:
    """A part's call as torch can save it compiled: a module-level `function(*leading, *tensors)`, the
    objects passed before the tensors (the model, the call's layout), and what the compiled code is
    specific to beyond the tensors' shapes (`identity`, JSON-able)."""

    function: Callable[..., torch.Tensor]
    leading: tuple
    identity: dict


def default_directory() -> Path:
    """Beside Inductor's cache (its lifetime: a saved compile's kernels are loaded from there)."""
    configured = os.environ.get(DIRECTORY_VARIABLE)
    if configured:
        return Path(configured)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "fewstep_saved_compiles"


def module_fingerprint(module: torch.nn.Module) -> str:
    """Every submodule's class and every parameter's and buffer's name, shape and dtype, hashed."""
    digest = hashlib.sha256()
    for name, sub in module.named_modules():
        digest.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__};".encode())
    for kind, tensors in (("p", module.named_parameters()), ("b", module.named_buffers())):
        for name, tensor in tensors:
            digest.update(f"{kind}{name}:{tuple(tensor.shape)}:{tensor.dtype}:{tensor.device.type};".encode())
    return digest.hexdigest()


def describe_value(value: Any) -> Any:
    """A JSON-able account of an argument the traced code may branch on: constants as they are,
    containers item by item, anything else by its type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):  # its shape and dtype are in the saved guards
        return "tensor"
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [describe_value(item) for item in value]]
    if isinstance(value, dict):
        return ["dict", sorted((str(key), describe_value(item)) for key, item in value.items())]
    if isinstance(value, torch.dtype):
        return str(value)
    return ["object", f"{type(value).__module__}.{type(value).__qualname__}"]


def environment() -> dict:
    """What compiled code depends on outside the model: torch's and Triton's versions and the GPU (the
    caller's identity holds the rest: ComfyUI's version and flags)."""
    versions = {"torch": torch.__version__, "format": FORMAT}
    try:
        versions["triton"] = importlib.import_module("triton").__version__
    except (ImportError, AttributeError):
        versions["triton"] = None
    if torch.cuda.is_available():
        versions["gpu"] = [torch.cuda.get_device_name(), list(torch.cuda.get_device_capability())]
    return versions


def compile_key(form: SavedForm, inputs: Sequence[torch.Tensor | None], dynamic_batch: bool, backend: str) -> str:
    """The file name of a compile of `form` for `inputs` under the current modes and environment."""
    description = {
        "function": f"{form.function.__module__}.{form.function.__qualname__}",
        "identity": form.identity,
        "inputs": [None if x is None else [list(x.shape), list(x.stride()), str(x.dtype), x.device.type]
                   for x in inputs],
        "dynamic_batch": dynamic_batch,
        "backend": backend,
        "modes": [torch.is_grad_enabled(), torch.is_inference_mode_enabled()],
        "environment": environment(),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=repr).encode()).hexdigest()[:40]


def changed_sources(compiled) -> list[str]:
    """The traced functions whose installed source differs from what was traced (module:first line)."""
    changed = []
    for source in compiled.source_info().inlined_sources:
        try:
            lines = inspect.getsourcelines(importlib.import_module(source.module))[0]
            now = "".join(lines[source.firstlineno - 1:source.lastlineno - 1])
        except (ImportError, OSError, TypeError):
            now = None
        if now is None or hashlib.sha256(now.encode()).hexdigest() != source.checksum:
            changed.append(f"{source.module}:{source.firstlineno}")
    return sorted(changed)


_ATOMS = (torch.dtype, torch.device, str, bytes, int, float, bool, type(None))


class _AtomsKept(dict):
    def __setitem__(self, key, value):
        if not isinstance(value, _ATOMS):
            super().__setitem__(key, value)


@contextlib.contextmanager
def dtypes_kept_in_saved_guards():
    """While saving guards: torch's guard pickler replaces a module attribute no guard reads with a
    "missing" marker, by the object's id — and so also every other use of that object. A model's
    `dtype` attribute is the torch.float16 object itself, which the saved tensors' metadata also
    needs; marked missing, the file cannot be loaded ("argument 'dtype' must be torch.dtype, not
    _Missing"). Atoms (dtypes, devices, numbers, strings) are never marked: they cost nothing to keep."""
    from torch._dynamo import guards

    pickler = guards.GuardsStatePickler
    initialise = pickler.__init__

    def keeping_atoms(self, *args, **kwargs):
        initialise(self, *args, **kwargs)
        kept = _AtomsKept()
        for key, value in self.missing_values.items():
            kept[key] = value
        self.missing_values = kept

    pickler.__init__ = keeping_atoms
    try:
        yield
    finally:
        pickler.__init__ = initialise


def aot_compile(form: SavedForm, inputs: Sequence[torch.Tensor | None], backend: str, options: dict | None,
                dynamic: bool | None):
    """`form.function` compiled ahead of time for (*form.leading, *inputs): a saveable compiled function.

    Raises where it cannot be: a graph break (fullgraph), a guard or object that cannot be saved."""
    compile_options = {**(options or {}), "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe}
    # torch 2.11 offers aot_compile on a compiled function only with this switch on (later ones always).
    switch = {"enable_aot_compile": True} if hasattr(torch._dynamo.config, "enable_aot_compile") else {}
    with torch._dynamo.config.patch(**switch):
        compiled = torch.compile(form.function, backend=backend, fullgraph=True, dynamic=dynamic,
                                 options=compile_options)
    if not hasattr(compiled, "aot_compile"):
        raise RuntimeError(f"this torch ({torch.__version__}) has no ahead-of-time compile of functions")
    with dtypes_kept_in_saved_guards():
        function = compiled.aot_compile(((*form.leading, *inputs), {}))
    function.disable_guard_check()  # checked by the caller, which says what a refusal means
    return function


def refusal(function, args: Sequence) -> str | None:
    """Why `function`'s saved guards refuse `args` (the first failing guard), or None where they accept."""
    if function.guard_check(*args):
        return None
    try:  # torch's own account of the failing guard (not public API: fall back to a plain statement)
        failure = function._artifacts.guard_manager.check_verbose(function.prepare_f_locals(*args))
        return f"its guards refuse this call ({'; '.join(failure.verbose_code_parts)[:300]})"
    except Exception:
        return "its guards refuse this call"


class SavedCompiles:
    """A folder of saved compiles by key; the most recently used kept, up to `max_bytes` together."""

    def __init__(self, directory: Path | str | None = None, max_bytes: int = MAX_SAVED_BYTES,
                 installation: str = INSTALLATION):
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self.installation = installation
        self._preload_lock = threading.Lock()
        self._preload_started = False
        self._preloading: dict[str, threading.Event] = {}  # key → set when its reading ended
        self._preloaded: dict[str, tuple] = {}  # key → (function, seconds, inference mode), until taken

    def path(self, key: str) -> Path:
        if self.directory is None:
            self.directory = default_directory()
        return self.directory / f"{self.installation}-{key}{SUFFIX}"

    def key_of(self, path: Path) -> str:
        return path.name[len(self.installation) + 1:-len(SUFFIX)]

    def load(self, key: str):
        """(the compiled function, None) or (None, why not: missing, stale or unreadable)."""
        path = self.path(key)
        if not path.exists():
            return None, "none saved"
        function, why = self.read(path)
        if function is not None:
            os.utime(path)  # recently used: kept longest
        return function, why

    def read(self, path: Path, delete_unreadable: bool = True):
        """The compiled function saved at `path`, or (None, why not); an unreadable file is deleted where
        `delete_unreadable` (a load for its own key: it is compiled again and replaced)."""
        def load():
            with open(path, "rb") as file, no_compile_worker_processes():
                return torch.compiler.load_compiled_function(file)

        try:  # a wait refused by a capture's check (captured_graph.host_syncs_are_errors): read again
            function = retried_after_sync_checks(load, "reading the saved compile again after it")
        except Exception as error:  # written by another torch, truncated, …
            if delete_unreadable and not interrupted_by_a_sync_check(error):  # refused: not the file's fault
                path.unlink(missing_ok=True)
            return None, f"the saved file could not be read ({type(error).__name__}: {str(error)[:200]})"
        changed = changed_sources(function)
        if changed:
            return None, (f"the code it traced has changed since it was saved ({', '.join(changed[:3])}"
                          f"{', …' if len(changed) > 3 else ''})")
        function.disable_guard_check()
        return function, None

    def preload_recent(self, count: int = PRELOAD_FILES, around=contextlib.nullcontext,
                       inference_mode: bool = True) -> list[str]:
        """Start reading the `count` most recently used files into memory on a thread of their own, once
        per store (a server's first accelerated prompt); returns their keys. `around()` is entered for
        the whole reading (the caller's GIL settings: the reading is Python, beside a running prompt).
        Read under `inference_mode` (ComfyUI runs prompts in it): torch builds a loaded compile's tensor
        guards from the reading thread's state, and in torch 2.11 guards read outside inference mode
        refuse every call made in it ("dispatch key set mismatch"); only a job in the same mode takes them.

        The prompt's jobs then take them (`take_preloaded`) instead of reading them after the model is
        loaded. What no job takes stays in memory (the compiled code and its kernels, tens of MB) for the
        life of the process; `count` bounds it."""
        with self._preload_lock:
            if self._preload_started:
                return []
            self._preload_started = True
            directory = self.directory if self.directory is not None else default_directory()
            try:
                files = sorted(directory.glob(f"{self.installation}-*{SUFFIX}"), key=lambda file: file.stat().st_mtime,
                               reverse=True)
            except OSError:  # removed meanwhile
                files = []
            files = files[:count]
            for file in files:
                self._preloading[self.key_of(file)] = threading.Event()
        # Started with no files too: its log line says that nothing was there to read.
        try:
            threading.Thread(target=self._preload, args=(files, around, inference_mode), name="fewstep-preload",
                             daemon=True).start()
        except RuntimeError:  # no thread to be had: nothing is read ahead, nobody waits for it
            with self._preload_lock:
                for event in self._preloading.values():
                    event.set()
                self._preloading.clear()
        return [self.key_of(file) for file in files]

    def _preload(self, files: list[Path], around, inference_mode: bool) -> None:
        started, read = time.perf_counter(), []
        try:
            # Its own CUDA stream: work on the legacy default stream would synchronise with a graph the
            # prompt thread may be capturing meanwhile, and break it (as for the compile worker).
            stream = torch.cuda.Stream() if torch.cuda.is_available() else None
            with (around(), torch.inference_mode(inference_mode),
                  torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
                for file in files:
                    key = self.key_of(file)
                    began = time.perf_counter()
                    try:
                        function, why = self.read(file, delete_unreadable=False)  # the job's own load decides
                    except Exception as error:  # never raised on this thread: the job reads it again
                        function, why = None, f"{type(error).__name__}: {error}"
                    with self._preload_lock:
                        if function is not None:
                            self._preloaded[key] = (function, time.perf_counter() - began, inference_mode)
                        self._preloading.pop(key).set()
                    if function is None:
                        log.info("FewStepAccelerate: the saved compile %s is not read ahead: %s", file.name, why)
                    else:
                        read.append(f"{key[:8]} {time.perf_counter() - began:.1f} s")
                if stream is not None:
                    wait_for(stream)
        finally:  # whatever happened, nobody waits for a reading that will not come
            with self._preload_lock:
                for event in self._preloading.values():
                    event.set()
                self._preloading.clear()
        log.info("FewStepAccelerate: read %d of the %d most recently used saved compiles ahead in %.1f s (%s)",
                 len(read), len(files), time.perf_counter() - started, ", ".join(read) or "none")

    def wait_until_read(self, timeout: float | None = None) -> bool:
        """Wait until every reading ahead has ended (for tests and benchmarks); False on timeout."""
        with self._preload_lock:
            events = list(self._preloading.values())
        deadline = None if timeout is None else time.monotonic() + timeout
        return all(event.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                   for event in events)

    def reading_ahead(self) -> bool:
        """Whether anything is read ahead, or being read, for a job to take (cheap: asked at every new shape)."""
        return bool(self._preloaded or self._preloading)

    def expecting(self, key: str) -> bool:
        """Whether `key` has been read ahead, or is being read."""
        with self._preload_lock:
            return key in self._preloaded or key in self._preloading

    def take_preloaded(self, key: str, timeout: float | None = 0, inference_mode: bool | None = None):
        """(the compiled function, seconds its reading took) read ahead for `key`, waiting up to `timeout`
        for a reading in progress; None where there is none, or it was read in another `inference_mode`
        than the one given. Taken: a second call gets None."""
        with self._preload_lock:
            reading = self._preloading.get(key)
        if reading is not None and not reading.wait(timeout):
            return None
        with self._preload_lock:
            taken = self._preloaded.get(key)
            if taken is None or (inference_mode is not None and taken[2] != inference_mode):
                return None  # none, or its guards would refuse the call: the job reads the file itself
            del self._preloaded[key]
        function, seconds, _ = taken
        with contextlib.suppress(OSError):  # pruned meanwhile: what was read is still good
            os.utime(self.path(key))  # recently used: kept longest
        return function, seconds

    def save(self, key: str, function) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside it and renamed into place: another server sharing the folder never reads half a file.
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            function.save_compiled_function(str(partial))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        files = sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda file: file.stat().st_mtime, reverse=True)
        total = 0
        for file in files:
            total += file.stat().st_size
            if total > self.max_bytes and file != keep:
                file.unlink(missing_ok=True)


STORE = SavedCompiles()

