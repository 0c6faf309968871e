"""Task metrics, as plain functions over strings and labels (no model, no store): text and classification."""
