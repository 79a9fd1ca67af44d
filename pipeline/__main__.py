"""`python -m pipeline <stage> [--stage N]`: run one DVC stage (what dvc.yaml's `cmd:` lines call).

torchrun relaunches a training stage this way too (`-m pipeline ...`, see
:func:`pipeline.cli.relaunch_distributed`).
"""

from pipeline.cli import main

if __name__ == "__main__":
    main(prog_name="python -m pipeline")
