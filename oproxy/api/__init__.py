"""
One module per OpenAI API family; each handler parses, delegates and renders.
"""
