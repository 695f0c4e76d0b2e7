"""train_and_evaluate and what it is built from: mesh and shardings, train state, optimizers, the input
pipeline, checkpointing (the only module that talks to orbax), config validation."""
