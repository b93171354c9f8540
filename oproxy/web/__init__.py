"""
The web face of the proxy: the route table, the steps every request goes
through, and the ways errors are written (OpenAI's, Ollama's).
"""
