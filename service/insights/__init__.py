"""Study insights over HTTP: live events, parameter importances and bulk learning curves."""
