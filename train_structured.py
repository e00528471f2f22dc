"""Train a network for the structured_sparsity setting (see README.md or --help)."""

from training_params import main

if __name__ == "__main__":
    main("structured_sparsity")
