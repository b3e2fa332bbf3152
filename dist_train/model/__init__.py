"""What is trained: the network, its losses, the unfreeze phases and the LR schedule."""
