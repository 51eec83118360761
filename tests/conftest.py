import torch

# The models are tiny: one thread is fastest and keeps the suite's numbers independent of
# how many cores the machine has.
torch.set_num_threads(1)
