"""Train, evaluate and predict CIFAR-10 from the command line: `python main.py fit --config configs/cifar.yaml`."""

from cifar.cli import main

if __name__ == "__main__":
    main()
