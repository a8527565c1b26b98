"""`python -m shakti_jax.train`: see shakti_jax/train/cli.py (its flags are this module's)."""

from absl import flags

from shakti_jax.train import cli

__doc__ = cli.__doc__  # absl prints the main module's docstring as the usage text
flags.adopt_module_key_flags(cli)

if __name__ == "__main__":
    cli.main()
