"""HalluLens in the harness: the task table, task YAMLs and prompt sets, the LLM client, judging,
the files a run leaves, step-0 generation and the `hallulens` command."""
