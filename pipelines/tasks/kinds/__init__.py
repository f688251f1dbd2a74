"""One module per task kind; each registers its `TaskKind` when imported (see
`pipelines.tasks.contract`)."""
