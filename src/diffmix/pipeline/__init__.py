"""The whole pipeline: synthesis, label fidelity, the five-arm experiment, its report, the demo."""
