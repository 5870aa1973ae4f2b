"""The census: the identity graph per property, its clustering, the questions people answer, and the refit."""
