"""What every stage shares: configuration, errors, Spark sessions, MLflow tracking, output
locations, executor fault context, executor worker upkeep and the device rule for inference tasks."""
