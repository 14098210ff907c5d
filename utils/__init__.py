"""Shared helpers of the stage scripts: command line, files, data processing."""
