"""The training runtime: ranks, engines, checkpoints, resumable state and the loop that ties them."""
