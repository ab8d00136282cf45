"""The study's pipeline: the five-arm experiment, its report, figures and paired intervals, and the
`fidelity`, `utility`, `experiment` and `demo` commands (synthesis itself is `diffmix.synth`)."""
