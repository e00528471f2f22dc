"""Train a network for the unstructured_sparsity setting (see README.md or --help)."""

from training_params import main

if __name__ == "__main__":
    main("unstructured_sparsity")
