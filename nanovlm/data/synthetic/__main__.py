"""`python -m nanovlm.data.synthetic`: see `nanovlm.data.synthetic.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
