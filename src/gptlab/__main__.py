"""`python -m gptlab ...`: the gptlab command; also how torchrun starts each process (`torchrun ... -m gptlab train ...`)."""

from gptlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
