"""Judging HalluLens answers: which judge (`settings`), the batched judge pass with re-asks of
unreadable replies (`judge`), reading verdicts out of replies (`verdicts`), what each task asks
and how verdicts become labels and rates (`scoring`), the harness filter that judges a task
inside `lm_eval` (`harness_filter`) and `hallulens judge` over a samples file (`offline`)."""
