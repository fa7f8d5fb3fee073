"""The experiment tooling built on the layers: data, the model zoo, training, the paper's
reproduction, results files and their tables, benchmarks."""
