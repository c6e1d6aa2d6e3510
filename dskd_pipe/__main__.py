"""`python -m dskd_pipe ...` and `torchrun ... -m dskd_pipe distill ...`: the `dskd-pipe` command."""
from dskd_pipe.stages.cli import main

main(prog_name="dskd-pipe")
