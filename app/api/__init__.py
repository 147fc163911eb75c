"""The HTTP front: DMR's routes and OpenAI's, as thin handlers over the service objects."""
