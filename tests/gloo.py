"""Running a test body on 2 CPU processes with gloo: spawn(body, args, out_dir) calls
body(rank, *args) in each process inside an initialised process group; a failure in any process
fails the spawn (and so the test)."""
import datetime
import faulthandler
import os
import sys
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _run(rank, body, args, out_dir):
    # a hang (a peer that died) fails the test instead of stalling it
    faulthandler.dump_traceback_later(120, exit=True)
    # rendezvous through a file (no port to race for) and gloo on the loopback interface (the
    # default, the hostname's address, is not always reachable in a sandbox)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        body(rank, *args)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Leave without tearing the process group down: in some sandboxes gloo's teardown aborts
    # ("terminate called without an active exception") with plain torch.nn modules too.
    sys.stdout.flush()
    os._exit(0)


def spawn(body, args, out_dir):
    mp.spawn(_run, args=(body, args, str(out_dir)), nprocs=WORLD, join=True)


def available() -> bool:
    return dist.is_available() and dist.is_gloo_available() and sys.platform != "win32"
