"""timm models and weights: creation, loading, and the CIFAR ResNets registered with timm."""
