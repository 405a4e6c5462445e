r"""Trains and evaluates PSCH.

  python main.py --config=configs/fashion_mnist.py --workdir=workdirs/fmnist
  python main.py --config=configs/cifar10.py --config.model.num_bits=64
  python main.py --config=configs/fashion_mnist.py --workdir=... --mode=eval

The flags and the work are in psch_jax/cli.py and psch_jax/train.py. Bad input
(config, data, checkpoint, work directory) prints what is wrong and how to fix it,
and exits with code 2.
"""
from psch_jax import cli

if __name__ == "__main__":
  cli.run(cli.train_main, define_flags=cli.define_train_flags, command="python main.py")
