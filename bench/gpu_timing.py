"""bench/gpu.py's clocks: CUDA-event and host-clock marks around stages, the stages of a prompt, a
cell of measurements, peak memory."""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field

import torch

STARTED = time.perf_counter()  # the bench's start: its --budget-s counts from here


def over_budget(args) -> bool:
    return time.perf_counter() - STARTED > args.budget_s


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- timing

class Marks:
    """Start/stop marks around a stage: CUDA events on the GPU (no synchronisation inside a run),
    the host clock on the CPU. Recorded only while `recording`."""

    def __init__(self, cuda: bool):
        self.cuda, self.recording, self.pairs, self._open = cuda, False, [], None

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self):
        if self.recording:
            self._open = self._mark()

    def stop(self):
        if self.recording and self._open is not None:
            self.pairs.append((self._open, self._mark()))
            self._open = None

    def take_ms(self) -> list[float]:
        synchronize(self.cuda)
        out = [s.elapsed_time(e) if self.cuda else (e - s) * 1e3 for s, e in self.pairs]
        self.pairs = []
        return out


# The stages of one ComfyUI prompt, in order, between host-clock stamps (PhaseClock).
PHASES = ("before sampling", "sampling", "to decode", "decode", "after decode")


class PhaseClock:
    """Host-clock stamps at the edges of a prompt's stages: where the end-to-end time that is neither
    UNet nor VAE goes (the executor, the sampler's set-up, copies). No synchronisation is added: the
    sampling stage ends with its latent copied to the CPU, and the decode stage is timed synchronised."""

    EDGES = ("sampling", "sampled", "decoding", "decoded")

    def __init__(self):
        self.stamps: dict[str, float] = {}

    def clear(self) -> None:
        """Before a timed prompt: the stamps of earlier prompts (warm-ups too) are dropped."""
        self.stamps = {}

    def mark(self, edge: str) -> None:
        self.stamps.setdefault(edge, time.perf_counter())  # the first: a prompt here samples once

    def phases_ms(self, started: float, finished: float) -> dict[str, float]:
        """The stages (PHASES) of the prompt stamped since clear(), in ms; empty where one was not stamped."""
        edges = [started, *(self.stamps.get(edge) for edge in self.EDGES), finished]
        if None in edges:
            return {}
        return {name: (end - begin) * 1e3 for name, begin, end in zip(PHASES, edges, edges[1:])}


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def median(values):
    return statistics.median(values) if values else float("nan")


@dataclass
class Cell:
    e2e_ms: float = float("nan")  # batch 1
    first_ms: float = float("nan")  # the first run at batch 1 (capture included where there is one)
    unet_ms: float = float("nan")  # per UNet call, batch 1
    vae_ms: float = float("nan")  # VAE decode stage, batch 1
    text_ms: float = float("nan")  # text encoding (prompt), measured apart
    peak_gib: float = float("nan")  # batch 1
    e2e4_ms: float = float("nan")  # batch 4
    unet4_ms: float = float("nan")
    vae4_ms: float = float("nan")
    peak4_gib: float = float("nan")
    capture_s: float = float("nan")  # accelerated: capture time of the batch-1 graphs
    capture4_s: float = float("nan")
    check: dict = field(default_factory=dict)  # accelerated vs eager agreement
    phases_ms: dict = field(default_factory=dict)  # ComfyUI, batch 1: median ms per stage of a prompt (PHASES)
    error: str = ""
    note: str = ""  # what the reader must know about how this cell was measured

    @property
    def images_per_s4(self) -> float:
        return 4e3 / self.e2e4_ms


class Memory:
    def __init__(self, cuda):
        self.cuda = cuda

    def reset(self):
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_reserved() / 2**30 if self.cuda else float("nan")


