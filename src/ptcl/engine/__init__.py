"""The only train loop, optimiser factory, evaluation, checkpointing and run driver."""
