# Generated from bundles/template/scripts/torchrun.py by scripts/generate_bundles.py: edit those, not this file.
"""torchrun with the same arguments, whose failed rendezvous says what happened: ``python -m scripts.torchrun ...``.

torchrun ends a rendezvous that did not gather ``--nnodes`` nodes within its join timeout (``--rdzv_conf
join_timeout=SECONDS``, 600 by default) with a traceback that ends in a bare ``RendezvousTimeoutError``. This
launcher runs torchrun itself (``torch.distributed.run``) and turns that error, and a rendezvous endpoint that
cannot be reached, into one message naming the rendezvous, its endpoint, the nodes it waited for and what to check.
Everything else (a worker that fails, a node lost during training) is torchrun's own report.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError
from torch.distributed.run import parse_args, run

# torch.distributed.elastic.rendezvous.dynamic_rendezvous.RendezvousTimeout's default join timeout, in seconds.
DEFAULT_JOIN_TIMEOUT = 600


def rendezvous_conf(text: str) -> dict[str, str]:
    """``--rdzv_conf`` ("key1=value1,key2=value2") as a dict."""
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def explain(args, error: Exception) -> str:
    """What a failed rendezvous means for the launch ``args`` (torchrun's parsed arguments)."""
    where = f"rendezvous {args.rdzv_id!r} at {args.rdzv_endpoint} ({args.rdzv_backend})"
    retry = (
        "Start this same command on every node (same --nnodes, --rdzv_id and --rdzv_endpoint, which must be an "
        "address of one of the nodes that every node can reach on that port)"
    )
    if isinstance(error, RendezvousTimeoutError):
        timeout = rendezvous_conf(args.rdzv_conf).get("join_timeout", DEFAULT_JOIN_TIMEOUT)
        return (
            f"torchrun: the {where} did not gather --nnodes {args.nnodes} nodes within join_timeout={timeout} s: "
            "a node was not started, was started with another --rdzv_id or --nnodes, or cannot reach "
            f"{args.rdzv_endpoint}. {retry}, within join_timeout of each other (--rdzv_conf join_timeout=SECONDS)."
        )
    cause = str(error.__cause__ or error).splitlines()[0].rstrip(".")  # torch's first line, without its C++ trace
    return f"torchrun: cannot reach the {where} ({cause}). {retry}."


@record
def main(argv: Sequence[str] | None = None) -> None:
    """Run torchrun with ``argv`` (default: this process's arguments); exit with a message if the rendezvous fails."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except (RendezvousTimeoutError, RendezvousConnectionError) as error:
        raise SystemExit(explain(args, error)) from error


if __name__ == "__main__":
    main()
