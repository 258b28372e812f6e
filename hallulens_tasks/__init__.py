"""HalluLens as harness tasks: YAML configs, prompt rendering, metrics, and the `hallulens` CLI."""
