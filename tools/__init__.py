"""Developer tools: dataset loading, CIFAR-style backbones, training and export."""
