"""Developer tools that do not ship with the package: training the built-in toy models."""
