r"""Trains and evaluates PSCH.

  python main.py --config=configs/fashion_mnist.py --workdir=workdirs/fmnist
  python main.py --config=configs/cifar10.py --config.model.num_bits=64
  python main.py --config=configs/fashion_mnist.py --workdir=... --mode=eval

The flags and `main` are psch_jax/commands/train.py's; the work is psch_jax/train.py's.
Bad input (config, data, checkpoint, work directory) prints what is wrong and how to
fix it, and exits with code 2.
"""
from psch_jax import cli
from psch_jax.commands import train

if __name__ == "__main__":
  cli.run(train.main, define_flags=train.define_flags, command="python main.py")
