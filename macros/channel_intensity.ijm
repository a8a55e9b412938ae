// Per-channel intensity measurement: mean, standard deviation, min, max and
// integrated density of every channel, over all Z planes, per time point.
//
// Input:  the current image, a hyperstack (C, Z, T any size); left unchanged.
// Output images: none (the input image is closed).
// Output tables: "Results" (one row per channel and time point)
//   Results: Channel (1-based), Frame (1-based), Voxels, Mean, StdDev, Min,
//      Max, IntDen (sum of pixel values over the channel's Z stack), Label
//      (the channel's name when the image has one).

#@ Boolean (label="Z projection first", value=false, description="Measure the max projection over Z instead of every Z plane") project

if (nImages == 0)
    exit("channel_intensity: no input image");
input = getImageID();
Stack.getDimensions(width, height, channels, slices, frames);
run("Clear Results");
row = 0;
for (frame = 1; frame <= frames; frame++) {
    for (c = 1; c <= channels; c++) {
        selectImage(input);
        Stack.setPosition(c, 1, frame);
        name = getInfo("slice.label");
        run("Duplicate...", "title=_channel duplicate channels=" + c + " frames=" + frame);
        work = getImageID();
        if (project && nSlices > 1) {
            run("Z Project...", "projection=[Max Intensity]");
            proj = getImageID();
            selectImage(work);
            close();
            work = proj;
            selectImage(work);
        }
        run("Select None");
        if (nSlices > 1) Stack.getStatistics(voxels, mean, min, max, std);
        else getStatistics(voxels, mean, min, max, std);
        setResult("Channel", row, c);
        setResult("Frame", row, frame);
        setResult("Voxels", row, voxels);
        setResult("Mean", row, mean);
        setResult("StdDev", row, std);
        setResult("Min", row, min);
        setResult("Max", row, max);
        setResult("IntDen", row, mean * voxels);
        if (name != "") setResult("Label", row, name);
        row++;
        close();
    }
}
updateResults();
selectImage(input);
close();
