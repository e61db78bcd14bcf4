"""What every layer may use and that uses no other layer: images and their files (`images`, `files`), checkpoint
downloads (`download`), the prompts, and the names of models and devices as users type them."""
