"""Engine glue: lm-eval model backends that capture activations through hallulens_capture."""
