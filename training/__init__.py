"""Training: data loaders and features, the DCNv2 CRM, the LLM scorer, the three-stage trainer."""
