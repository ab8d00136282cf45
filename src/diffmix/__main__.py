"""`python -m diffmix ...`: the same entry point as the `diffmix` console script."""

from diffmix.cli import main

if __name__ == "__main__":
    main()
