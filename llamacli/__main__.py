"""`python -m llamacli`: the same as the `llamacli` command."""

from llamacli.cli import main

if __name__ == "__main__":
    main()
