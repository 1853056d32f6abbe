"""longlive.pipelines."""
