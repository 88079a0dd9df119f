"""cifar: a LightningCLI application that trains, evaluates and serves a CIFAR-10 classifier, logged to W&B."""
