"""Training: run configs, optimizer and schedule, checkpoints, metrics, torchrun support, the tasks
(language modelling, image classification), warm starts, and the one loop."""
