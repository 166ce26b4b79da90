"""The scheduler process: the faust app, its hot cycle and the stages it runs."""
