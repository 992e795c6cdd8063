"""``python -m distill ...`` = ``stepsmith distill ...`` (for ``accelerate launch -m distill``)."""

import sys

from schedules.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
