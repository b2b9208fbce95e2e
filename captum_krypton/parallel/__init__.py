"""Several devices for one call (threads and worker processes), and data sets
sharded over the ranks of torch.distributed."""
