"""Which waits for the GPU torch refuses under host_syncs_are_errors, on another thread and on its own."""
import threading

import torch

from fewstep.acceleration.captured_graph import host_syncs_are_errors, wait_for

print(torch.__version__)
x = torch.randn(4096, 4096, device="cuda")


def attempt(name, fn, res):
    try:
        fn()
        res[name] = "passed"
    except Exception as e:
        res[name] = "refused: " + str(e)[:70]


def checks(res):
    attempt("event wait_for", lambda: wait_for(torch.cuda.current_stream()), res)
    attempt("stream.synchronize", lambda: torch.cuda.current_stream().synchronize(), res)
    attempt("torch.cuda.synchronize", torch.cuda.synchronize, res)
    attempt(".item()", lambda: (x @ x).sum().item(), res)
    attempt(".cpu()", lambda: (x[:2, :2] * 2).cpu(), res)


other, same = {}, {}
with host_syncs_are_errors():
    thread = threading.Thread(target=checks, args=(other,))
    thread.start()
    thread.join()
    checks(same)
print("other thread:", other)
print("same thread:", same)
