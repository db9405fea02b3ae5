"""Federated training with Flower (Message API): no image, and nothing computed per image,
leaves a node; only model weights (optionally clipped and noised) cross the network."""
