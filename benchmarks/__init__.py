"""`corella bench`: latency, throughput and quality suites over a bundle; JSON, Markdown and PNG out."""
