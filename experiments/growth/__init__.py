"""Does growing a TokenFormer by parameter tokens pay? A compute-fair comparison with training from
scratch, over seeds, with a standard Transformer grown by FFN widening as the control. See
`experiments/growth.md` for the protocol and the results; `python -m experiments.growth --help`."""
