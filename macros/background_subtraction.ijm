// Rolling-ball background subtraction of every plane of a hyperstack.
//
// Input:  the current image, a hyperstack (C, Z, T any size); processed in place.
// Output images: "background_subtracted" (same type and dimensions as the input).
// Output tables: none.

#@ Double (label="Rolling ball radius (pixels)", value=50, min=0.1, description="Radius of the rolling ball: larger than the largest object that is not background") radius
#@ Boolean (label="Light background", value=false, description="The background is brighter than the objects") light_background
#@ Boolean (label="Sliding paraboloid", value=false, description="Use a sliding paraboloid instead of a rolling ball") sliding_paraboloid
#@ Boolean (label="Disable smoothing", value=false, description="Do not smooth the image before computing the background (3x3 mean)") disable_smoothing

if (nImages == 0)
    exit("background_subtraction: no input image");
if (radius <= 0)
    exit("background_subtraction: radius must be > 0, got " + radius);
options = "rolling=" + radius;
if (light_background) options = options + " light";
if (sliding_paraboloid) options = options + " sliding";
if (disable_smoothing) options = options + " disable";
if (nSlices > 1) options = options + " stack";
run("Subtract Background...", options);
rename("background_subtracted");
