"""Training a cell of configs: batched Adam, trainables with hand-written gradients, the torch and native engines behind one step interface, and the loop. Imports only lorabench.core."""
