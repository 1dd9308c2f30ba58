"""dcmdp Kubernetes operator (kopf). Never imports torch."""
